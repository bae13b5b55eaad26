"""Fixed cost of a build without a model: running its units imports no torch, open_clip, transformers
or faiss (checked in a fresh interpreter, after the build); with simplejpeg the codec is loaded."""
import json
import subprocess
import sys

from PIL import Image

HEAVY = ("torch", "open_clip", "transformers", "faiss", "librosa", "apache_beam", "distributed")

SCRIPT = """
import json, sys
from mmdata.build import build
from mmdata.config import load_config
m = build(load_config(input=sys.argv[1], out=sys.argv[2], workers=1, progress=False, jpeg_codec=sys.argv[3]))
print(json.dumps({"counts": m["counts"], "modules": sorted(k for k in sys.modules if "." not in k)}))
"""


def test_a_build_without_a_model_imports_no_model_library(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(3):
        Image.new("RGB", (300 + i, 200), (40 * i, 90, 160)).save(corpus / f"a{i}.jpg")
        (corpus / f"a{i}.txt").write_text(f"a caption {i}")
    for codec in ("pillow", "simplejpeg"):
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(corpus), str(tmp_path / codec), codec],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        facts = json.loads(res.stdout.strip().splitlines()[-1])
        assert facts["counts"]["written"] == 3
        loaded = set(facts["modules"])
        assert "mmdata" in loaded and ("simplejpeg" in loaded) == (codec == "simplejpeg")
        assert not loaded & set(HEAVY), loaded & set(HEAVY)
