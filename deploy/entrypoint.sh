#!/bin/sh
# Entrypoint of the trainer image: turns the compose environment into one `pgrpo` command line.
#
#   pgrpo-entrypoint train     # fresh run, or --resume when the run dir already holds a checkpoint
#   pgrpo-entrypoint extract   # v_hack for the preset (pgrpo extract skips it when it is up to date)
#   pgrpo-entrypoint ARGS...   # anything else is passed to `pgrpo` unchanged (e.g. `bench step`)
# Extra arguments after train/extract are appended (e.g. `--set steps=50`).
#
# Environment (defaults in brackets):
#   PGRPO_PRESET [fast-dev-run]   jobs/<preset>.yaml          PGRPO_SEED [0]
#   PGRPO_RUN [<preset>-seed<seed>]  run dir name under PGRPO_RUNS_DIR [/runs]; also the Prometheus `run` label
#   PGRPO_GRADER_SOCKET []        grader sidecar socket; empty = the trainer starts a local grader child
#   PGRPO_VHACK []                v_hack file (arm.vhack_path); empty = the preset's own value
#   PGRPO_METRICS_PORT [9400]     PGRPO_METRICS_LINGER [60] seconds /metrics stays up after the last step
#   PGRPO_CACHE_DIR [/cache] (SVD cache under svd/)               PGRPO_JOBS_DIR [/app/jobs]
#   PGRPO_NPROC [1]               GPUs (ranks) of this run: > 1 launches `torchrun --nproc_per_node N
#                                 --max-restarts 0 -m pgrpo train` (data parallel, docs/training.md)
#   PGRPO_TORCHRUN_ARGS [--standalone]  rendezvous flags for multi-node, e.g.
#                                 "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id run1"
#
# Resume rule: a restarted container finds ckpt_*.safetensors in its run dir and continues it with
# `pgrpo train --resume` (the checkpoint's config is reused; only the socket and metrics settings are re-applied).
#
# Exit codes and the restart policy (compose: `restart: on-failure`): a crash, an OOM kill or a grader that gave
# up is non-zero and restarted (and resumes). A user error (pgrpo exits 2: a bad preset key, a corrupted newest
# checkpoint, a run dir locked by another trainer) would fail the same way on every restart, so the entrypoint
# prints it, says it is not restarting, and exits 0: Docker's restart policy cannot exclude one exit code.
# SIGTERM (docker stop) is forwarded to pgrpo, which stops its grader and exits 143.
set -eu

preset=${PGRPO_PRESET:-fast-dev-run}
seed=${PGRPO_SEED:-0}
runs=${PGRPO_RUNS_DIR:-/runs}
cache=${PGRPO_CACHE_DIR:-/cache}
jobs=${PGRPO_JOBS_DIR:-/app/jobs}
config=$jobs/$preset.yaml
say() { echo "pgrpo-entrypoint: $*" >&2; }
nproc=${PGRPO_NPROC:-1}
case "$nproc" in
''|*[!0-9]*|0*) say "PGRPO_NPROC must be a positive number of GPUs (ranks) per run, got '$nproc'"; exit 2 ;;
esac
no_restart() { say "$*: a user error, not restarting; fix it and start the service again"; exit 0; }

# run pgrpo as a child (not exec) so its exit code can be read; forward SIGTERM/SIGINT to it
# one process, or one torchrun over nproc ranks (a failed rank stops the run; the container restart resumes it;
# torchrun reports a rank's exit 2 as its own failure, so on N ranks a user error is restarted like a crash)
run_pgrpo() {
    if [ "$nproc" -gt 1 ] && [ "$1" = train ]; then
        shift
        # shellcheck disable=SC2086  # the rendezvous flags are meant to split into words
        torchrun ${PGRPO_TORCHRUN_ARGS:---standalone} --nproc_per_node "$nproc" --max-restarts 0 -m pgrpo train "$@" &
    else
        pgrpo "$@" &
    fi
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
    rc=0
    wait "$child" || rc=$?
    while kill -0 "$child" 2>/dev/null; do   # a trap interrupted `wait`: wait again for the real exit code
        rc=0
        wait "$child" || rc=$?
    done
    trap - TERM INT
    if [ "$rc" -eq 2 ]; then
        no_restart "pgrpo exited 2 (see the line above)"
    fi
    exit "$rc"
}

cmd=${1:-train}
[ $# -gt 0 ] && shift

case "$cmd" in
train)
    run=${PGRPO_RUN:-$preset-seed$seed}
    dir=$runs/$run
    # settings of this container (not of the experiment): re-applied on every start, resume included
    # (the linger keeps /metrics up after the last step so Prometheus scrapes the final values)
    set -- --metrics-port "${PGRPO_METRICS_PORT:-9400}" --metrics-linger "${PGRPO_METRICS_LINGER:-60}" "$@"
    if [ -n "${PGRPO_GRADER_SOCKET:-}" ]; then
        set -- --set "grader_socket=$PGRPO_GRADER_SOCKET" "$@"
    fi
    if ls "$dir"/ckpt_*.safetensors >/dev/null 2>&1; then
        say "resuming $dir from its last checkpoint"
        run_pgrpo train --resume "$dir" "$@"
    fi
    [ -f "$config" ] || no_restart "no preset $config (PGRPO_PRESET=$preset)"
    if [ -n "${PGRPO_VHACK:-}" ]; then
        set -- --set "arm.vhack_path=$PGRPO_VHACK" "$@"
    fi
    say "new run $dir (preset $preset, seed $seed, $nproc rank(s))"
    run_pgrpo train --config "$config" --out "$dir" --set "seed=$seed" --set "run_name=$run" \
        --set "adapter.svd_cache_dir=$cache/svd" "$@"
    ;;
extract)
    [ -f "$config" ] || no_restart "no preset $config (PGRPO_PRESET=$preset)"
    out=${PGRPO_VHACK:-/vhack/vhack.safetensors}
    mkdir -p "$(dirname "$out")"
    say "v_hack for preset $preset -> $out"
    # the preset's own seed on purpose: both arms (any SEED) share one v_hack, as in jobs/sweep-full.yaml
    run_pgrpo extract --config "$config" --out "$out" --set "adapter.svd_cache_dir=$cache/svd" "$@"
    ;;
*)
    exec pgrpo "$cmd" "$@"
    ;;
esac
