"""The router registry: ``ExpertConfig.router_type`` names an entry here."""

from ..registry import Registry

ROUTERS = Registry("router", "router_type")
register_router = ROUTERS.register
