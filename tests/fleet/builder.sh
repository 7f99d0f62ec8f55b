# Builds a sandbox "system". PATH is unset in nix builders, hence the
# absolute paths; echo is a shell builtin.
if [ "$buildDelay" != 0 ]; then /bin/sleep "$buildDelay"; fi
/bin/mkdir -p "$out/bin" "$out/sw/bin" "$out/etc"
if [ "$payloadKiB" != 0 ]; then
  /bin/dd if=/dev/urandom of="$out/payload" bs=1024 count="$payloadKiB" 2>/dev/null
fi
# What NixOS's toplevel has: the kernel, initrd and modules it boots, the
# packages of its environment, its units.
/bin/ln -s "$kernel/content" "$out/kernel"
/bin/ln -s "$initrd/content" "$out/initrd"
/bin/ln -s "$kernelModules" "$out/kernel-modules"
for p in $packages; do echo "$p"; done > "$out/sw/packages"
if [ -n "$units" ]; then echo "$units" > "$out/etc/units"; else : > "$out/etc/units"; fi

# The host's "systemctl": `reboot` asks the sandbox host's init to
# reboot it (see the sandbox's host init), as systemd would.
{
  echo '#!/bin/sh'
  echo 'case "$1" in reboot) echo reboot 2>/dev/null >/nix/var/cim-sandbox/reboot & exit 0 ;; esac'
  echo 'echo "sandbox systemctl: only reboot is simulated" >&2; exit 1'
} > "$out/sw/bin/systemctl"
/bin/chmod +x "$out/sw/bin/systemctl"

# What the host runs at boot (NixOS's stage 2 runs the booted system's
# `activate`): it makes the system current and brings its network up.
a="$out/activate"
{
  echo '#!/bin/sh'
  echo "/bin/ln -sfn $out /run/current-system"
  if [ "$healthy" = 1 ]; then
    echo 'echo ok > /run/cim-health'
  else
    echo 'echo "degraded: simulated unhealthy system" > /run/cim-health'
  fi
  if [ "$breakNetwork" = 1 ]; then
    echo '/usr/sbin/ip link set eth0 down'
  else
    echo '/usr/sbin/ip link set eth0 up'
  fi
} > "$a"
/bin/chmod +x "$a"

s="$out/bin/switch-to-configuration"
{
  echo '#!/bin/sh'
  # dry-activate: say which units activation would stop, restart and
  # start, on stderr as NixOS does, and change nothing.
  echo 'if [ "$1" = dry-activate ]; then'
  echo "  new=$out/etc/units"
  echo '  old=/run/current-system/etc/units stop= restart= start='
  echo '  if [ -e "$old" ]; then'
  echo '    while IFS== read -r name value; do'
  echo '      [ -n "$name" ] || continue'
  echo '      now=$(/bin/grep "^$name=" "$new")'
  echo '      if [ -z "$now" ]; then stop="$stop${stop:+, }$name"'
  echo '      elif [ "$now" != "$name=$value" ]; then restart="$restart${restart:+, }$name"; fi'
  echo '    done < "$old"'
  echo '  fi'
  echo '  while IFS== read -r name value; do'
  echo '    [ -n "$name" ] || continue'
  echo '    /bin/grep -q "^$name=" "$old" 2>/dev/null || start="$start${start:+, }$name"'
  echo '  done < "$new"'
  echo '  if [ -n "$stop" ]; then echo "would stop the following units: $stop" >&2; fi'
  echo '  echo "would activate the configuration..." >&2'
  echo '  if [ -n "$restart" ]; then echo "would restart the following units: $restart" >&2; fi'
  echo '  if [ -n "$start" ]; then echo "would start the following units: $start" >&2; fi'
  echo '  exit 0'
  echo 'fi'
  if [ "$activationDelay" != 0 ]; then
    echo "/bin/sleep $activationDelay"
  fi
  echo "echo \"\$1 $out\" >> /run/cim-activations"
  if [ "$activationExitCode" != 0 ]; then
    echo "echo 'simulated activation failure of $hostName' >&2"
    echo "exit $activationExitCode"
  fi
  echo 'case "$1" in switch|test) ;; *) exit 0 ;; esac'
  # switch and test activate the system now, as at boot.
  echo "exec $a"
} > "$s"
/bin/chmod +x "$s"
echo "$hostName $version" > "$out/nixos-version"
