FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY environment_provider ./environment_provider
RUN pip install --no-cache-dir .

COPY providers /providers
ENV IUT_PROVIDERS=/providers/iut \
    EXECUTION_SPACE_PROVIDERS=/providers/execution-space \
    LOG_AREA_PROVIDERS=/providers/log-area

ENTRYPOINT ["environment-provider"]
CMD ["worker", "--loglevel", "INFO"]
