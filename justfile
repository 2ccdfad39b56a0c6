# Recipes run inside .venv (./dev puts it first on PATH). `./dev --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Start the server; extra flags go to trioserve (see `./dev serve --help`)
serve *ARGS:
    python -m trioserve {{ARGS}}

# Run the test suite (extra args go to pytest)
test *ARGS:
    python -m pytest {{ARGS}}

# The test suite beside one spinning process per core (each stops by itself after 30 min): a test that hopes the machine is fast fails here
test-busy *ARGS:
    python -m tests.busy -- python -m pytest {{ARGS}}

# Lint, format check, strict typing and the layering contract (pyproject's [tool.importlinter])
check:
    ruff check trioserve tests bench
    ruff format --check trioserve tests bench
    mypy
    lint-imports

# Format the code in place
fmt:
    ruff format trioserve tests bench
    ruff check --fix trioserve tests bench

# Throughput/latency benchmark against the forward-pass bound (and transformers serve when installed)
bench *ARGS:
    python -m bench {{ARGS}}

# Thousands of mixed requests (completions, aborts, deadlines, bad input) against a real server; checks leaks
soak *ARGS:
    python -m bench.soak {{ARGS}}
