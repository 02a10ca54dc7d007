from setuptools import find_packages, setup

setup(
    name="affinequant",
    version="0.1.0",
    description="Block-wise post-training quantization of LLMs: OmniQuant (LWC, LET) and AffineQuant",
    packages=find_packages(include=["affinequant", "affinequant.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "transformers>=5.0",
        "accelerate",
        "gguf",
        "safetensors",
        "tqdm",
        "numpy",
        "pandas",
        "pyarrow",
        "datasets",
        "lm_eval>=0.4,<0.5",
    ],
    extras_require={"test": ["pytest"]},
    py_modules=[],
)
