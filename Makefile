# so101-meanflow: `make demo` runs the simulated arm + policy closed loop; `make test` runs every test.
# Both set the workspace up first (scripts/setup.sh is idempotent: seconds when nothing changed).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV := source build/env.sh &&

.PHONY: setup test demo clean

setup:
	@bash scripts/setup.sh

test: setup
	@$(ENV) bash scripts/run_tests.sh

demo: setup
	@$(ENV) bash scripts/demo.sh

clean:
	rm -rf build install log
