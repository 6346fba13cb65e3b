#!/usr/bin/env bash
# The CPU preset of the paper scripts, one after another, each one's wall time logged to
# runs/paper/logs/walltimes.txt (its output to runs/paper/logs/<script>.log).
#   examples/paper/run_cpu_set.sh                        # all: train the models 2 at a time, then every script
#   examples/paper/run_cpu_set.sh table1 table2_3:autoattack ...   # these (":flag" adds --flag)
set -u
mkdir -p runs/paper/logs
scripts=("$@")
if [ ${#scripts[@]} -eq 0 ]; then
    scripts=(train_models table1 table4 table2_3:autoattack table5_6 table8_9 table10
             table11 figure2 figure3 figure4)
fi
for script in "${scripts[@]}"; do
    name=${script%%:*}
    flag=()
    [[ $script == *:* ]] && flag=("--${script#*:}")
    start=$(date +%s)
    python -m "examples.paper.${name}" --preset cpu "${flag[@]}" > "runs/paper/logs/${name}.log" 2>&1
    rc=$?
    echo "${script}: rc ${rc}, wall $(( $(date +%s) - start )) s" >> runs/paper/logs/walltimes.txt
done
