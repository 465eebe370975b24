# SpikeStream: two commands do all the set-up.
#   make demo   creates .venv, installs, runs the built-in scene with the shipped weights
#   make test   creates .venv, installs, runs the whole suite
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak eval venv clean

venv: $(STAMP)

# torch goes in first and alone: unpinned, a dependency resolver would fetch a multi-GB CUDA
# build. A GPU user installs their CUDA torch into .venv before running make (see README).
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) run.py --source synthetic --duration 5 --sink overlay

test: $(STAMP)
	$(VPY) -m pytest -q

# Peers (spikingjelly, snnTorch) only for benchmarks, never for `make test`. --no-deps and a pin to
# the installed torch: their dependency trees otherwise replace torch (and pull torchvision/audio).
PEERS := $(VENV)/.peers
$(PEERS): benchmarks/requirements-peers.txt $(STAMP)
	$(VPY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PIP) install -q --no-deps -c $(VENV)/torch-pin.txt -r benchmarks/requirements-peers.txt
	touch $(PEERS)

bench: $(STAMP) $(PEERS)
	$(VPY) -m benchmarks.run

soak: $(STAMP)
	$(VPY) -m benchmarks.soak

eval: $(STAMP)
	$(VPY) run.py eval --benchmark

clean:
	rm -rf $(VENV) runs .pytest_cache
