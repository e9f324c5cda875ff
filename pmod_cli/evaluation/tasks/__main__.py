from . import TASKS_DIR

print(TASKS_DIR)
