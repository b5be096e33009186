#!/bin/sh
# Example policy: a metrics scraper that may reach every workload's exporter
# port in one environment, and an ops bastion allowed ssh and ICMP everywhere.
set -eu
segd ctl rule add --provider 'env=prod' --consumer 'role=prometheus,env=prod' --service tcp/9100-9199 --description 'metrics scrape'
segd ctl rule add --provider any --consumer 'role=bastion' --service tcp/22 --service icmp --option log --description 'ops access (logged)'
segd ctl profile add prometheus --labels 'role=prometheus,env=prod' --lock role,env --max-uses 2 --lifespan 1h
segd ctl profile add bastion --labels 'role=bastion' --lock role --max-uses 1 --lifespan 15m
