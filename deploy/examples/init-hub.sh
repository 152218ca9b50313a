#!/bin/sh
# EXAMPLE: set up a hub and its first laptops. Run as root on the hub; adjust the values.
set -eu

# Creates /var/lib/pytun (mode 0700): private.key, registry.db and hub.json, and prints the
# hub's public key. The resulting hub.json is deploy/examples/hub.json:
#   subnet             inner addresses; the hub takes the first (10.77.0.1), laptops the rest
#                      (subnet6 too, for --subnet 10.77.0.0/24,fd77::/64: dual stack)
#   endpoint           HOST[:PORT] that laptops dial; goes into every laptop's config
#   listen_port        UDP port the hub listens on (open it in your firewall)
#   interface, mtu     the hub's TUN interface (1420 fits a 1500-byte IPv6 underlay)
#   egress             interface full-tunnel traffic is masqueraded out of
#                      (absent: the interface of the default route)
#   dns                DNS servers written into laptop configs
#   routes             networks behind the hub, added to split-tunnel laptops' AllowedIPs
#   allow_peer_to_peer whether init adds the access rule "everyone -> everyone"
# init also writes the default access rules (pytun-admin access list): laptops ping the hub,
# use its DNS when --dns names it, reach the --route networks, and full-tunnel laptops reach
# the internet. Everything else from laptops is dropped.
# To change a setting later, stop the hub, edit hub.json, start the hub. Configs already
# handed out keep the old endpoint, DNS and routes.
pytun-admin init \
    --subnet 10.77.0.0/24 \
    --endpoint vpn.example.com \
    --egress eth0 \
    --dns 10.77.0.1 \
    --route 192.168.10.0/24

# A laptop that gets a fresh key pair: its config (private key inside) goes to alice.conf, 0600.
# alice is in the group dev, which the rule below lets reach one port of one network.
pytun-admin add-peer alice --group dev -o alice.conf
pytun-admin access add dev 192.168.10.0/24 tcp/5432 --comment "the database"

# The default rule "everyone -> 192.168.10.0/24" (from --route) opens all of that network to
# every laptop; to keep only per-group rules, remove it by its id:
# pytun-admin access list
# pytun-admin access remove 4
# Which rule lets alice reach the database (or why nothing does):
pytun-admin access explain alice 192.168.10.5 tcp/5432

# A laptop whose owner made its own key (`wg genkey | tee bob.key | wg pubkey`): the private
# key never leaves the laptop; the config printed has a placeholder to fill in.
# pytun-admin add-peer bob --public-key 'BOB_PUBLIC_KEY_BASE64=' -o bob.conf

# A phone that sends everything through the hub, as a QR code for the WireGuard app. It is in
# the group full-tunnel, which the default rule "full-tunnel -> internet" lets out.
pytun-admin add-peer carol-phone --full-tunnel --qr

pytun-admin list-peers
