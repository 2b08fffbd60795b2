# The two commands of the README. Both do their own set-up (scripts/setup.sh, idempotent).
.PHONY: app test setup

app:            ## set up .venv and start the Gradio app on the embedded default model
	scripts/setup.sh
	.venv/bin/python app.py $(ARGS)

test:           ## set up .venv (with test tools and Debian's chromium) and run the whole test suite
	scripts/setup.sh --dev
	.venv/bin/python -m pytest $(ARGS)

setup:
	scripts/setup.sh --dev
