# The two commands a new user needs; both install what they need first.
.PHONY: demo test
demo:
	@venv=$$(scripts/setup-venv.sh) && $$venv/bin/streamrec demo $(ARGS)
test:
	@scripts/test.sh $(ARGS)
