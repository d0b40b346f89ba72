# anomstream: `make run` runs the whole pipeline end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two installs, each with its stamp: `make run` and the other commands install what they run (the
# package with the `train` extra, TensorFlow, and the local broker's jars); `make test` adds the
# `test` extra (pytest, pyspark, psycopg, import-linter, docker-py) and the Spark Kafka connector's
# jars (spark/pom.xml). Either works on a fresh machine.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test run test train evaluate bench kafka-up kafka-down docker-config clean

install: $(RUN_STAMP)

install-test: $(TEST_STAMP)

# A fresh machine needs Python >= 3.11, Java 17 and Maven; everything else is fetched here.
$(RUN_STAMP): pyproject.toml broker/pom.xml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train]'
	$(BIN)/python -m shared.local_broker fetch
	touch $@

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml spark/pom.xml
	$(BIN)/pip install -q -e '.[test,train]'
	$(BIN)/anomstream spark-detect --fetch-jars
	touch $@

run: install
	$(BIN)/anomstream run

test: install-test
	$(BIN)/python -m pytest

train: install
	$(BIN)/anomstream train --epochs 50

bench: install
	$(BIN)/anomstream bench

evaluate: install
	$(BIN)/anomstream evaluate

kafka-up: install
	$(BIN)/anomstream kafka up

kafka-down:
	$(BIN)/anomstream kafka down

docker-config:  # the compose v2 plugin if present, else Debian's docker-compose
	if docker compose version >/dev/null 2>&1; then docker compose -f docker/docker-compose.yml config --quiet; \
	else docker-compose -f docker/docker-compose.yml config --quiet; fi

clean:
	-$(BIN)/anomstream kafka down
	rm -rf .anomstream .cache models/artifacts evaluation_results
