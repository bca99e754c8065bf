"""The router registry: ``ExpertConfig.router_type`` names an entry here."""

from ...config import ExpertConfig
from ...options import flag_for
from ..registry import Registry

ROUTERS = Registry("router", flag_for(ExpertConfig, "router_type"))
register_router = ROUTERS.register
