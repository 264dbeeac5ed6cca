#!/usr/bin/env bash
# Check the README's RS-M-CLIP commands offline against a Hugging Face cache that already holds
# joaodaniel/RS-M-CLIP and xlm-roberta-base: export, parity, classify, tile-search, one PASS/FAIL line each.
#
# Usage: bash scripts/check_rs_m_clip.sh [HF_HOME [OUT_DIR]]
#   HF_HOME  default: $HF_HOME, else ~/.cache/huggingface (where a hub download put the files)
#   OUT_DIR  keep the bundle and outputs here (default: a temporary folder, removed at the end)
# Without hub access, build a stand-in cache first (random weights of the same architecture):
#   python -m training.hub_cache /tmp/rs-m-clip-hf && bash scripts/check_rs_m_clip.sh /tmp/rs-m-clip-hf
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
hf_home=${1:-${HF_HOME:-$HOME/.cache/huggingface}}
[ -d "$hf_home" ] || { echo "check_rs_m_clip.sh: no such folder HF_HOME=$hf_home" >&2; exit 2; }
export HF_HOME=$(cd "$hf_home" && pwd)
export HF_HUB_OFFLINE=1
unset HF_HUB_CACHE
if [ -n "${2:-}" ]; then
    mkdir -p "$2" || exit 2
    out=$(cd "$2" && pwd)
    logs=" (log: $out/NAME.log)"
else
    logs=""
    out=$(mktemp -d "${TMPDIR:-/tmp}/check-rs-m-clip.XXXXXX")
    trap 'rm -rf "$out"' EXIT
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo "$(pwd)/.venv/bin/python" || echo python3)}
export RSMCLIP_GEO_CACHE="$out/cache"
bundle="$out/rs-m-clip"
failures=0

step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, print PASS/FAIL with the time taken
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$out/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
    else
        echo "FAIL $name ($((SECONDS - start)) s)${logs/NAME/$name}"
        tail -n 5 "$out/$name.log" | sed 's/^/    /'
        failures=$((failures + 1))
    fi
}

check_parity() {  # the export's parity figures against the fp32 thresholds
    "$python" - "$bundle/bundle.json" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1], encoding="utf-8"))
parity = info["parity"]
print(json.dumps(parity, indent=1))
ok = (min(parity["image_min_cosine"], parity["text_min_cosine"]) >= 0.99999 and parity["tokenizer_mismatches"] == 0
      and parity["preprocess_max_abs_diff"] <= 1e-5)
sys.exit(0 if ok else 1)
EOF
}

check_classify() {  # one JSON line per probe image, probabilities over the labels summing to 1
    "$python" -m rsmclip_geo classify training/probes/images/aid_airport_1.jpg \
        training/probes/images/aid_forest_1.jpg --model "$bundle" --json -o "$out/classify.jsonl" \
        --labels "Many airplanes in the open area." "Un campo de golf con bunkers." "Uma floresta densa." "森林" \
        && "$python" - "$out/classify.jsonl" <<'EOF'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
for line in lines:
    print(line["image"], line["label"], round(line["score"], 4))
sys.exit(0 if len(lines) == 2 and all(abs(sum(l["probabilities"].values()) - 1) < 1e-6 for l in lines) else 1)
EOF
}

check_tile_search() {  # the README's search on the bundled demo scene: GeoJSON with hits
    "$python" -m rsmclip_geo tile-search rsmclip_geo/data/demo_aid_mosaic.tif "aeroporto" --model "$bundle" \
        -o "$out/hits.geojson" --no-progress \
        && "$python" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["features"] else 1)' \
            "$out/hits.geojson"
}

echo "HF_HOME=$HF_HOME HF_HUB_OFFLINE=1, outputs in $out"
step export "$python" -m training.export --model hf-hub:joaodaniel/RS-M-CLIP -o "$bundle" -v
if [ -f "$bundle/bundle.json" ]; then
    step parity check_parity
    step classify check_classify
    step tile-search check_tile_search
else
    echo "FAIL parity, classify, tile-search: no bundle to run them on"
    failures=$((failures + 3))
fi
[ "$failures" -eq 0 ] && echo "all 4 steps passed" || echo "$failures of 4 steps failed"
[ "$failures" -eq 0 ]
