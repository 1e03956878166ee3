"""The one serving layer both servers are built on.

- `add_server_arguments` / `ServerConfig.from_args`: the flags (and env
  defaults) every server takes: address, TLS, token, message limit, grace.
- `build_server`: a grpc.Server with message limits set, the project's
  interceptors (token check, error-to-status mapping), the standard health
  service and server reflection registered.
- `ErrorMappingInterceptor`: the one place that turns `imagesearch.errors`
  into gRPC status codes.
- `serve`: start, log `listening on HOST:PORT`, and on SIGTERM/SIGINT mark
  health NOT_SERVING and stop with a grace period that drains in-flight work.
"""

from imagesearch.serving.config import (
                                        ServerConfig,
                                        add_logging_arguments,
                                        add_server_arguments,
                                        configure_logging,
                                        env_default,
                                        read_token_file,
)
from imagesearch.serving.interceptors import (
                                        HEALTH_SERVICE,
                                        OPEN_METHOD_PREFIXES,
                                        ErrorMappingInterceptor,
                                        TokenAuthInterceptor,
                                        item_error_fields,
                                        status_code,
)
from imagesearch.serving.server import RunningServer, build_server, install_signal_handlers, serve_until_signalled

__all__ = [
    "ServerConfig", "add_logging_arguments", "add_server_arguments", "configure_logging", "env_default",
    "read_token_file", "HEALTH_SERVICE", "OPEN_METHOD_PREFIXES", "ErrorMappingInterceptor",
    "TokenAuthInterceptor", "item_error_fields", "status_code", "RunningServer", "build_server",
    "install_signal_handlers", "serve_until_signalled",
]
