from trioserve.cli import run

run()
