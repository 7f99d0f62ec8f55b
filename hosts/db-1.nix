{ ... }:
{
  networking.hostName = "db-1";
  services.postgresql.enable = true;
}
