"""The example flow the quick start deploys: prints a greeting and logs it to Prefect."""

from prefect import flow, get_run_logger


@flow(log_prints=True)
def hello(name: str = "world") -> str:
    logger = get_run_logger()
    logger.info("Hello, %s! (from a flow run launched by prefect-agent-operator)", name)
    return f"Hello, {name}!"


if __name__ == "__main__":
    hello()
