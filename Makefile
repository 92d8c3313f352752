# make demo  - a fresh machine to a first federated run (creates .venv)
# make test  - the serial suite, then the MPI suite under mpirun -n 2 and -n 3
# Nothing clever: a virtualenv, pinned CPU torch, the project, mpi4py and an MPI from PyPI.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIRUN ?= $(VENV)/bin/mpirun
# The CPU wheel; an unpinned torch pulls a multi-GB CUDA build. setup.py keeps a range.
TORCH  ?= torch==2.13.0

# Open MPI refuses root without these; oversubscription lets 3 ranks share 2 cores in tests.
ROOT_ENV := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
MPI_ENV  := $(ROOT_ENV) OMP_NUM_THREADS=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe

.PHONY: demo test test-serial test-mpi bench lint clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[mpi,dp]'
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[mpi,dp,test]'
	touch $@

demo: $(VENV)/.installed
	rm -rf runs/demo/quickstart
	$(MPI_ENV) timeout 600 $(MPIRUN) -n 2 $(PY) -m hpcfed run jobs/quickstart.toml out=runs/demo

test: test-serial test-mpi

test-serial: $(VENV)/.test-installed
	$(PY) -m ruff check .
	timeout 1200 $(PY) -m pytest -q
	# the kernels once more as plain Python, so coverage and tracebacks see their bodies
	NUMBA_DISABLE_JIT=1 timeout 600 $(PY) -m pytest -q -m "not slow" tests/test_kernels.py tests/test_codecs.py

test-mpi: $(VENV)/.test-installed
	$(MPI_ENV) timeout 600 $(MPIRUN) -n 2 $(PY) -m pytest -q --with-mpi -m mpi
	$(MPI_ENV) timeout 600 $(MPIRUN) -n 3 $(PY) -m pytest -q --with-mpi -m mpi

bench: $(VENV)/.test-installed
	$(PY) -m pip install -q -e '.[mpi,dp,test,bench]'
	$(PY) benchmarks/bench_round.py --out benchmarks/results/round.json

lint: $(VENV)/.test-installed
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info runs
