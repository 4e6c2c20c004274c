"""Install dissect: `pip install -e .` (add `[test]` for the test suite)."""

from pathlib import Path

from setuptools import find_packages, setup

VERSION = "0.1.0"

setup(
    name="dissect",
    version=VERSION,
    description="Network Dissection and unit ablation for PyTorch vision models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dissect", "dissect.*"]),
    package_data={"dissect": ["py.typed"], "dissect.report": ["templates/*"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "dask[array,distributed]>=2023.1",
        "pillow>=9.4",
        "jinja2>=3.1",
        "tqdm>=4.64",
        "captum>=0.7",
    ],
    extras_require={"test": ["pytest>=7.0", "ruff>=0.4"]},
    entry_points={"console_scripts": ["dissect=dissect.cli:main"]},
)
