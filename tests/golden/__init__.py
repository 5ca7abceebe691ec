"""Golden files: the expected output of every graph pass, and models saved by today's toolkit."""
