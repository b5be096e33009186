#!/bin/sh
# Example policy: a three-tier shop (what `make demo` sets up).
#   web -> api on tcp/8080, api -> db on tcp/5432, and DNS for everyone.
# Run against a server: SEGD_SERVER=https://segd.example:7400 SEGD_TOKEN=... sh config/shop-policy.sh
set -eu
segd ctl rule add --provider 'role=api,app=shop' --consumer 'role=web,app=shop' --service tcp/8080 --description 'web uses api'
segd ctl rule add --provider 'role=db,app=shop'  --consumer 'role=api,app=shop' --service tcp/5432 --description 'api uses db'
segd ctl rule add --provider 'role=dns'          --consumer any                --service udp/53 --service tcp/53 --description 'name service'

for tier in web api db; do
    segd ctl profile add "shop-$tier" --labels "role=$tier,app=shop,env=prod" \
        --lock role,app --max-uses 20 --lifespan 24h --on-mismatch deny \
        --description "shop $tier tier"
done
