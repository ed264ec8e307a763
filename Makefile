# lcbc: make install | make test | make demo | make bench
VENV ?= .venv
PYTHON := $(VENV)/bin/python
LCBC := $(VENV)/bin/lcbc
DATA ?= datasets
RUN ?= runs/bc_mt10_state
export MUJOCO_GL ?= egl
export EGL_PLATFORM ?= surfaceless
export HF_HUB_OFFLINE ?= 1
# pip's root-user and new-release notices ask nothing of an lcbc user.
export PIP_ROOT_USER_ACTION ?= ignore
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: install test demo bench lint clean

install: $(VENV)/.installed

# torch's CPU build goes in first, so the package's torch range is already satisfied and no CUDA
# build is pulled in; EGL (for rendering Meta-World images) comes from Debian when missing.
$(VENV)/.installed: pyproject.toml
	@if ! ldconfig -p | grep -q 'libEGL_mesa.so'; then \
		echo "installing EGL for offscreen rendering (libegl1 libegl-mesa0)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 >/dev/null; \
	fi
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# Two test processes (pytest-xdist), one per core of the 2-core machines the suite is sized for.
test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider -n 2

lint: install
	$(VENV)/bin/ruff check lcbc tests benchmarks

# The main job end to end: collect MT10 expert demonstrations (state), inspect them, train RT-1-tiny
# conditioned on language, export it, evaluate it on validation goals beside the scripted expert, and
# ask it to open the drawer. Each step resumes or is quick to redo.
demo: install
	$(LCBC) collect --benchmark metaworld:MT10 --episodes-per-task 50 --obs state --out $(DATA)/mt10_state.hdf5 --resume
	$(LCBC) inspect $(DATA)/mt10_state.hdf5
	$(LCBC) fit --config configs/bc_mt10_state.yaml --ckpt_path last
	$(LCBC) export $(RUN)/checkpoints/last.ckpt $(RUN)/policy
	$(LCBC) eval --policy $(RUN)/policy --benchmark metaworld:MT10 --episodes 50 --videos 1 --out $(RUN)/eval
	$(LCBC) act --policy $(RUN)/policy --task drawer-open-v3 "pull the drawer open" --video $(RUN)/drawer-open.gif

# Speed tables in docs/BENCHMARKS.md; needs `make demo`'s dataset and policy first.
bench: install
	$(PYTHON) benchmarks/loader.py --data $(DATA)/mt10_state.hdf5 --out docs/BENCHMARKS.md
	$(PYTHON) benchmarks/policy.py --data $(DATA)/mt10_state.hdf5 --policy $(RUN)/policy
	$(PYTHON) benchmarks/eval_speed.py --policy $(RUN)/policy

clean:
	rm -rf $(VENV) .pytest_cache
