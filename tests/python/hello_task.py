"""The task script the conformance tests run through clearml-agent.

Under the agent, `Task.init` attaches to the task being executed, so the SDK's remote-run calls (parameters,
console log, status) reach the emulator as well. Prints a marker line and exits 0.
"""

from clearml import Task

task = Task.init()
parameters = task.connect({"steps": 3, "learning_rate": 0.1})
task.get_logger().report_scalar(title="loss", series="train", value=0.5, iteration=1)
print("fleet-conformance-task-ran steps={}".format(parameters["steps"]))
