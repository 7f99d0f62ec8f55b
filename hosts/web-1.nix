{ ... }:
{
  networking.hostName = "web-1";
  services.nginx = {
    enable = true;
    virtualHosts."web-1".locations."/".return = "200 'web-1 is up\\n'";
  };
  networking.firewall.allowedTCPPorts = [ 80 ];
}
