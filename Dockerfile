# One image for the producer and the GPU workers. The CUDA runtime comes with the torch wheel.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY neuron ./neuron
COPY producer ./producer
COPY worker ./worker
COPY neuron_models ./neuron_models
COPY db ./db
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 && pip install --no-cache-dir ".[samples]"
ENTRYPOINT ["neuron"]
