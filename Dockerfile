# Passerelle: the relay as a non-root service. Spool and audit live on volumes; routing.yaml and
# the key material are mounted read-only (docker-compose.yml). The base image is pinned to an
# exact release so that a rebuild gets the same Python and Debian; bump it deliberately.
FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10025 --user-group --home /srv/passerelle passerelle \
 && mkdir -p /srv/passerelle/var/spool /srv/passerelle/var/audit \
 && chown -R passerelle:passerelle /srv/passerelle/var
WORKDIR /opt/passerelle
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
RUN pip install --no-cache-dir .
USER passerelle
WORKDIR /srv/passerelle
EXPOSE 2525 9464
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/srv/passerelle/routing.yaml"]
