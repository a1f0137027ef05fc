# Sourced by the scripts: the Python of this checkout's environment, picked as ./dev picks it:
# $PYTHON if set, else the active virtual environment ($VIRTUAL_ENV), else .venv, else python3.
# (A hard-coded .venv/bin/python made .ci/run exit 127 inside an activated virtualenv, where
# ./dev never creates .venv.)
aefast_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    echo "$VIRTUAL_ENV/bin/python"
  elif [ -x .venv/bin/python ]; then
    echo .venv/bin/python
  else
    echo python3
  fi
}
