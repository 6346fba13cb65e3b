#!/usr/bin/env bash
# Run paper scripts one after another with --preset cpu, logging each one's wall time.
#   examples/paper/run_cpu_set.sh table1 table2_3 ...    (extra options: EXTRA="--autoattack")
set -u
mkdir -p runs/paper/logs
for script in "$@"; do
    start=$(date +%s)
    python -m "examples.paper.${script%%:*}" --preset cpu $( [[ $script == *:* ]] && echo "--${script#*:}") \
        > "runs/paper/logs/${script%%:*}.log" 2>&1
    rc=$?
    echo "${script}: rc ${rc}, wall $(( $(date +%s) - start )) s" >> runs/paper/logs/walltimes.txt
done
