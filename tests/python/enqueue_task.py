"""Create a task from a script with the real clearml SDK and enqueue it.

Used by the conformance tests against the ClearML API emulator. The SDK reads the server address and
credentials from the clearml.conf that CLEARML_CONFIG_FILE names. Prints the task id as the last line.
"""

import argparse

from clearml import Task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", required=True, help="project name, created when missing")
    parser.add_argument("--name", required=True, help="task name")
    parser.add_argument("--script", required=True, help="path of the Python script the task runs")
    parser.add_argument("--queue", required=True, help="name of the queue to enqueue the task to")
    args = parser.parse_args()

    # packages="" stores no requirements, so the agent installs nothing for this task.
    task = Task.create(
        project_name=args.project,
        task_name=args.name,
        script=args.script,
        packages="",
        add_task_init_call=False,
        detect_repository=False,
    )
    Task.enqueue(task, queue_name=args.queue)
    print(task.id)


if __name__ == "__main__":
    main()
