"""Multitask (joint) training: the upper bound continual methods are measured against.

At stage t it trains on the union of the training data of tasks 1..t, so it fills the same accuracy
matrix as a continual method while never being asked to remember: every earlier task is still there.
Its data budget grows with t (the whole past is kept), which is what makes it an upper bound and not a
method a user with a memory limit can run.

    methods: [multitask]
"""

from lvlm_cl.methods.base import Method, Task


class Multitask(Method):
    name = "multitask"

    def setup(self, model, stream: list[Task]) -> None:
        self.stream = stream

    def before_task(self, task: Task, model, train_data: list) -> list:
        data = train_data
        for t in reversed(self.stream[:task.index]):      # earlier tasks first; tables stay tables
            data = t.train_records + data
        return data
