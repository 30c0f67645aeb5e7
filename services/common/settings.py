"""The one settings object, read from ``DATAENGINE_*`` environment variables at start-up.

Nothing else in the code base reads ``os.environ``; components take a ``Settings`` (or the values
they need from it) as an argument.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Engine configuration; every field is ``DATAENGINE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DATAENGINE_", extra="ignore")

    # Object store
    store: Literal["local", "minio"] = "local"
    store_root: Path = Path("./dataengine-data")  # local backend: the directory holding the bucket
    minio_endpoint: str = "localhost:9000"  # host:port, no scheme
    minio_access_key: str = ""
    minio_secret_key: str = ""
    minio_secure: bool = False  # HTTPS
    minio_ca_file: Path | None = None  # HTTPS: the private CA of MinIO's certificate (None: public roots)
    bucket: str = "dataengine"

    # Queues
    broker_url: str = "redis://localhost:6379/0"
    # A task unacknowledged this long (its worker died) is delivered again; longer than any task.
    visibility_timeout_s: int = Field(3600, ge=2)
    # Celery message signing (services/common/queues.py, sign_messages): this process's RSA key and
    # certificate, and the certificates whose signatures workers accept (a folder or a glob)
    queue_signing_key: Path | None = None  # None: plain JSON messages (anyone reaching Redis may send)
    queue_signing_cert: Path | None = None
    queue_signing_store: str = ""

    # SAM model
    model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_b"
    checkpoint: Path | None = None  # None: the official checkpoint in models_dir
    models_dir: Path = Path("~/.cache/dataengine/models")
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    embed_batch_size: int = Field(4, ge=1)
    embedding_cache_size: int = Field(64, ge=0)  # embeddings kept in decoder memory (2 MiB each)

    # Orchestrator: routing by verifier score (see services/orchestrator/routing.py)
    accept_threshold: float = Field(0.9, ge=0.0, le=1.0)  # s >= this: accepted
    review_threshold: float = Field(0.7, ge=0.0, le=1.0)  # this <= s < accept: review; below: rejected
    max_attempts: int = Field(5, ge=1)  # a step failing this often with storage trouble: dead letter
    # The self-healing sweep (services/orchestrator/sweep.py): every sweep_interval_s an orchestrator
    # re-sends the steps sent more than step_grace_s ago that are neither queued, held by a worker,
    # nor reported; a step a worker holds longer than step_deadline_s is sent again too (0: no sweep)
    sweep_interval_s: float = Field(5.0, ge=0)
    step_grace_s: float = Field(15.0, gt=0)
    step_deadline_s: float = Field(1800.0, gt=0)
    # AmgParams fields for the pipeline's grid masks, as JSON: '{"points_per_side": 16}'; {} = official defaults
    amg_params: dict[str, float | int] = Field(default_factory=dict)
    # "ontology" (offline): known labels + taxonomy hard negatives; "labels"; "openai"; "transformers"
    concepts_backend: str = "ontology"
    # "heuristic" (offline): SAM's signals x mask geometry; "openai"; "transformers"
    verifier_backend: str = "heuristic"
    # Grounding (services/concepts/grounding.py): "" = the concepts backend's own boxes and points;
    # "sam3", "grounding_dino", "owlv2" = every instance of each phrase from that model's local directory
    grounding_backend: str = ""
    grounding_model_dir: Path | None = None
    grounding_threshold: float = Field(0.3, ge=0.0, le=1.0)  # a detection's least score
    grounding_nms_iou: float = Field(0.5, gt=0.0, le=1.0)  # boxes of one phrase overlapping more: one
    grounding_max_instances: int = Field(50, ge=1)  # per phrase, best first
    grounding_vocabulary: bool = False  # also propose the known labels and taxonomy categories it finds

    # Model backends of the concepts and verifier services
    concepts_model_dir: Path | None = None  # transformers: a local model directory (from_pretrained)
    concepts_endpoint: str = ""  # openai: base URL of an OpenAI-compatible API, e.g. http://vllm:8000/v1
    concepts_model: str = ""  # openai: the model name the endpoint serves
    concepts_max_positives: int = Field(20, ge=1)  # default caps of a proposal
    concepts_max_negatives: int = Field(20, ge=0)
    concepts_taxonomy: Path | None = None  # ontology: a taxonomy JSON; None: the shipped one
    verifier_model_dir: Path | None = None
    verifier_endpoint: str = ""
    verifier_model: str = ""
    verifier_calibration: Path | None = None  # JSON written by `dataengine calibrate`
    mllm_api_key: str = ""  # bearer token for the endpoints ("": sends "EMPTY", as vLLM expects)
    mllm_timeout_s: float = Field(60.0, gt=0)  # per request to an endpoint or per local generation
    mllm_max_retries: int = Field(2, ge=0)  # endpoint retries on timeouts, 429 and 5xx
    mllm_max_new_tokens: int = Field(1536, ge=1)  # a 40-phrase JSON answer is ~1,000 tokens

    # Human review (the studio): a claim expires this long after its last heartbeat; a share of the
    # human-accepted items goes to a second annotator (audit)
    review_lease_s: float = Field(600.0, gt=0)
    page_token_max_age_s: float = Field(86400.0, gt=0)  # a ListItems page token older than this: stale
    audit_rate: float = Field(0.05, ge=0.0, le=1.0)
    # Active mining (services/common/failure_modes.py): the bars of the failure modes of an item routed
    # to a human, and the review queue's weights over them as JSON ('{"rare_phrase": 2}'; {} = defaults)
    mining_low_mask_score: float = Field(0.7, ge=0.0, le=1.0)  # a mask verdict below: low_mask_quality
    mining_exhaustive_score: float = Field(0.9, ge=0.0, le=1.0)  # an exhaustivity verdict below: in doubt
    mining_negative_present_score: float = Field(0.5, ge=0.0, le=1.0)  # a hard negative's P(absent) below
    mining_crowded_instances: int = Field(20, ge=1)  # instance masks over the positives: crowded_scene
    mining_crowded_grid_masks: int = Field(100, ge=1)  # or automatic grid masks
    mining_small_area_fraction: float = Field(0.001, ge=0.0, le=1.0)  # a mask smaller (share of the image)
    mining_rare_phrase_items: int = Field(3, ge=0)  # a phrase fewer items carry: rare_phrase (0: never)
    mining_weights: dict[str, float] = Field(default_factory=dict)
    # Studio: its HTTP port, and in a deployment the gRPC servers it is a client of
    studio_port: int = 8080
    orchestrator_address: str = "localhost:50055"
    decoder_address: str = "localhost:50052"

    # Who may do what (services/common/auth.py): the servers' token digests, the clients' token
    auth_tokens_file: Path | None = None  # None: no authentication (the embedded mode; warned in a deployment)
    auth_token: str = ""  # what the CLI and the studio send as "authorization: Bearer <token>"
    # Transport security of gRPC and the studio (services/common/tls.py): PEM files; none set: plaintext
    tls_cert_file: Path | None = None  # this process's certificate chain (server; client cert for mTLS)
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # what the other side's certificate must chain to
    tls_client_auth: Literal["none", "optional", "require"] = "none"  # servers: "require" = mTLS
    grpc_reflection: bool = True  # the reflection service (grpcurl, Postman); off hides the API's shape

    # Input limits
    max_image_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb limit
    max_message_bytes: int = Field(64 * MiB, ge=1 * MiB)  # gRPC send/receive limit
    max_labels: int = Field(256, ge=1)  # known labels of one request (services/common/limits.py)
    max_label_chars: int = Field(200, ge=1)  # longest label: a noun phrase, not a document
    max_id_chars: int = Field(128, ge=24)  # longest item id or page token a caller may send

    # Servers
    host: str = "0.0.0.0"
    embedder_port: int = 50051
    decoder_port: int = 50052
    concepts_port: int = 50053
    verifier_port: int = 50054
    orchestrator_port: int = 50055
    metrics_port: int = 0  # 0: no Prometheus endpoint and no gRPC or task metrics counted
    grpc_workers: int = Field(4, ge=1)
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_thresholds(self) -> "Settings":
        if self.review_threshold > self.accept_threshold:
            raise ValueError(f"DATAENGINE_REVIEW_THRESHOLD ({self.review_threshold}) must not exceed "
                             f"DATAENGINE_ACCEPT_THRESHOLD ({self.accept_threshold})")
        return self

    @model_validator(mode="after")
    def _check_amg_params(self) -> "Settings":
        from services.common.amg_params import params_from_json

        params_from_json(self.amg_params)  # InvalidInput (a ValueError) names the bad field
        return self

    @model_validator(mode="after")
    def _check_mining_weights(self) -> "Settings":
        from services.common.failure_modes import check_weights

        check_weights(self.mining_weights)  # InvalidInput (a ValueError) names the bad key or weight
        return self

    @model_validator(mode="after")
    def _check_minio(self) -> "Settings":
        if self.store == "minio" and not (self.minio_access_key and self.minio_secret_key):
            raise ValueError(
                "DATAENGINE_STORE=minio needs DATAENGINE_MINIO_ACCESS_KEY and DATAENGINE_MINIO_SECRET_KEY")
        if self.minio_ca_file is not None and not self.minio_secure:
            raise ValueError("DATAENGINE_MINIO_CA_FILE is for HTTPS: set DATAENGINE_MINIO_SECURE=true")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> "Settings":
        from services.common.tls import TlsFiles

        TlsFiles.from_settings(self)  # InvalidInput names the missing partner file
        return self

    @model_validator(mode="after")
    def _check_signing(self) -> "Settings":
        named = [self.queue_signing_key is not None, self.queue_signing_cert is not None, bool(self.queue_signing_store)]
        if any(named) and not all(named):
            raise ValueError("queue message signing needs all three of DATAENGINE_QUEUE_SIGNING_KEY, "
                             "DATAENGINE_QUEUE_SIGNING_CERT and DATAENGINE_QUEUE_SIGNING_STORE")
        return self

    def port_of(self, service: str) -> int:
        """The gRPC port of ``service`` ("embedder", "decoder", ...)."""
        return int(getattr(self, f"{service}_port"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
