"""A class whose body defines more than methods: a nested exception class and a factory."""


class Planner:
    class Error(Exception):
        pass

    factory = dict

    def plan(self, steps: int) -> list[int]:
        if steps < 0:
            raise Planner.Error("negative")
        return list(range(steps))
