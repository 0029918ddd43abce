"""Cold `build_profile` (no cache) on a checkpoint under cProfile: wall, peak RSS, stage timings, top functions.
A proxy for the 1.1B auto run: SHAPE_1B with fewer layers (same widths), e.g. 4 (docs/BENCHMARKS.md).

    nice -n 5 .venv/bin/python benchmarks/profile_analyzer_proxy.py MODEL_DIR OUT_PROFILE.json
"""
import sys, time, cProfile, pstats, resource, json
sys.path.insert(0, '.')
from analyzer.profile import build_profile
from pathlib import Path
model = Path(sys.argv[1]); out = sys.argv[2]
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
prof = build_profile(model, Path("data/calibration.jsonl"), cache=None)
pr.disable()
print("wall", time.perf_counter() - t, "maxrss GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
print(json.dumps(prof.timings))
prof.save(out)
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(45)
