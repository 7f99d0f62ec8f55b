# Builds a sandbox "system". PATH is unset in nix builders, hence the
# absolute paths; echo is a shell builtin.
if [ "$buildDelay" != 0 ]; then /bin/sleep "$buildDelay"; fi
/bin/mkdir -p "$out/bin"
if [ "$payloadKiB" != 0 ]; then
  /bin/dd if=/dev/urandom of="$out/payload" bs=1024 count="$payloadKiB" 2>/dev/null
fi
s="$out/bin/switch-to-configuration"
{
  echo '#!/bin/sh'
  if [ "$activationDelay" != 0 ]; then
    echo "/bin/sleep $activationDelay"
  fi
  echo "echo \"\$1 $out\" >> /run/cim-activations"
  if [ "$activationExitCode" != 0 ]; then
    echo "echo 'simulated activation failure of $hostName' >&2"
    echo "exit $activationExitCode"
  fi
  echo 'case "$1" in switch|test) /bin/ln -sfn '"$out"' /run/current-system ;; esac'
  # What a health check of the host reads.
  if [ "$healthy" = 1 ]; then
    echo 'echo ok > /run/cim-health'
  else
    echo 'echo "degraded: simulated unhealthy system" > /run/cim-health'
  fi
  # A system either brings the host's network up or, to simulate a
  # configuration that locks the controller out, takes it down.
  if [ "$breakNetwork" = 1 ]; then
    echo 'case "$1" in switch|test) /usr/sbin/ip link set eth0 down ;; esac'
  else
    echo 'case "$1" in switch|test) /usr/sbin/ip link set eth0 up ;; esac'
  fi
} > "$s"
/bin/chmod +x "$s"
echo "$hostName $version" > "$out/nixos-version"
