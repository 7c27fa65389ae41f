"""Gathers `make gpu-check`'s stage results ($OUT/stages.tsv + each stage's JSON) into $OUT/gpu_check.json."""
import json
import os
import sys

out = os.environ.get("OUT", ".")
res = {"dry": os.environ.get("GPU_CHECK_DRY") == "1", "stages": {}, "fails": []}
with open(os.path.join(out, "stages.tsv")) as f:
    for line in f:
        name, rc, secs = line.split()
        res["stages"][name] = {"rc": int(rc), "seconds": int(secs), "timed_out": rc in ("124", "137")}
        if rc != "0":
            res["fails"].append(f"stage {name} rc={rc}")
for name in ("ops", "bench_step", "train", "bench_compile"):
    p = os.path.join(out, f"{name}.json")
    if os.path.isfile(p):
        with open(p) as f:
            res[name] = json.load(f)
    elif name in res["stages"]:
        res["fails"].append(f"stage {name} wrote no {name}.json")
for k in ("env", "build", "pytest"):
    p = os.path.join(out, f"{k}.txt")
    if os.path.isfile(p):
        with open(p, errors="replace") as f:
            res.setdefault("logs_tail", {})[k] = f.read()[-3000:]
res["fails"] += [f"ops: {n}" for n in res.get("ops", {}).get("fails", [])]
res["total_seconds"] = sum(s["seconds"] for s in res["stages"].values())
tmp = os.path.join(out, "gpu_check.json.tmp")
with open(tmp, "w") as f:
    json.dump(res, f, indent=1)
os.replace(tmp, os.path.join(out, "gpu_check.json"))
print(f"gpu_check.json: {len(res['stages'])} stages in {res['total_seconds']}s, fails: {res['fails'] or 'none'}")
sys.exit(1 if res["fails"] else 0)
