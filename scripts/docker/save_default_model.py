"""Save the default model (SmolLM2-135M-Instruct, de-quantized from the pinned GGUF) as a transformers
directory for the Docker smoke test: the shipped pack was fitted on these weights, and its fingerprint
check refuses other weights.

    python scripts/docker/save_default_model.py ~/models/smollm2-135m

transformers 5 writes the RoPE base only as ``rope_parameters``; TGI 3.3.7's transformers 4.51 reads
``rope_theta`` and would fall back to 10000 (this model uses 100000), so the 4.x keys are added.
"""
import json
import sys
from pathlib import Path

from autosteer.models import load_model


def main(out: str) -> None:
    model, tok = load_model()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    path = Path(out) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"saved {type(model).__name__} to {out} (rope_theta {cfg.get('rope_theta')})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
