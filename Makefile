# The two commands of the README, and a few more for developers.
# Each target does its own set-up (scripts/bootstrap) on a fresh machine.

VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bootstrap servers-up servers-down clean

demo: bootstrap          ## the main job: real dispatch over simulated GPUs
	$(BIN)/gpu-dispatch demo $(ARGS)

test: bootstrap          ## every test, against a real Redis and a real Nacos
	$(BIN)/python -m pytest $(ARGS)

bootstrap:
	@scripts/bootstrap

servers-up: bootstrap
	$(BIN)/gpu-dispatch servers up

servers-down:
	$(BIN)/gpu-dispatch servers down

clean: servers-down     ## stop our servers and delete everything generated
	rm -rf .local $(VENV)
