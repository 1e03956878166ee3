"""The one serving layer both servers are built on (grpc.aio).

- `add_server_arguments` / `ServerConfig.from_args`: the flags (and env
  defaults) every server takes: address, TLS, token, limits and abuse bounds.
- `build_server`: a grpc.aio server on its own loop thread, with message
  limits and bounds set, the interceptors (`build_interceptors`: token check,
  stream idle timeout, error-to-status mapping), the standard health service
  (Watch capped) and server reflection registered.
- `ErrorMappingInterceptor`: the one place that turns `imagesearch.errors`
  into gRPC status codes; `item_error` builds a stream's per-item error.
- `Readiness`: a servicer answers UNAVAILABLE until its core is attached.
- `StreamReader`: the one request-stream reader of both servicers.
- `serve_until_signalled`: on SIGTERM/SIGINT mark health NOT_SERVING and
  stop with a grace period that drains in-flight work.
"""

from imagesearch.logs import add_logging_arguments, configure_logging
from imagesearch.serving.budget import ByteBudget
from imagesearch.serving.config import (
                                        ServerConfig,
                                        StartupError,
                                        add_server_arguments,
                                        env_default,
                                        read_token_file,
                                        run_main,
)
from imagesearch.serving.interceptors import (
                                        HEALTH_SERVICE,
                                        OPEN_METHOD_PREFIXES,
                                        ErrorMappingInterceptor,
                                        StreamIdleInterceptor,
                                        TokenAuthInterceptor,
                                        build_interceptors,
                                        item_error,
                                        item_error_fields,
                                        status_code,
)
from imagesearch.serving.readiness import Readiness
from imagesearch.serving.server import (
                                        RunningServer,
                                        build_server,
                                        install_signal_handlers,
                                        serve_until_signalled,
                                        server_options,
)
from imagesearch.serving.streams import StreamReader

__all__ = [
    "ByteBudget", "ServerConfig", "StartupError", "add_logging_arguments", "add_server_arguments",
    "configure_logging", "env_default", "read_token_file", "run_main", "HEALTH_SERVICE", "OPEN_METHOD_PREFIXES",
    "ErrorMappingInterceptor", "StreamIdleInterceptor", "TokenAuthInterceptor", "build_interceptors",
    "item_error", "item_error_fields", "status_code", "Readiness", "RunningServer", "build_server",
    "install_signal_handlers", "serve_until_signalled", "server_options", "StreamReader",
]
