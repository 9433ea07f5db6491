FROM python:3.11-slim

# A compiler is needed because llama-cpp-python builds llama.cpp from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["sh", "-c", "python manage.py migrate --noinput && python manage.py sync_prompts && daphne -b 0.0.0.0 -p 8000 gateway_project.asgi:application"]
