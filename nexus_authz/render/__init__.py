"""Renderers of the shipped proxy configs for other addresses: `envoy` (envoy/*.yaml, structural edits by
listener and cluster name) and `nginx` (deploy/nginx/nginx.conf, directives by name;
`python -m nexus_authz.render.nginx`)."""
