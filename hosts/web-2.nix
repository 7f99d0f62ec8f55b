{ ... }:
{
  networking.hostName = "web-2";
  services.nginx = {
    enable = true;
    virtualHosts."web-2".locations."/".return = "200 'web-2 is up\\n'";
  };
  networking.firewall.allowedTCPPorts = [ 80 ];
}
