#!/bin/sh
# Prints an ARI or AMI user section from the environment, for `#exec` in ari.conf / manager.conf:
# credentials never live in the config files.
case "$1" in
  ari)
    [ -n "${ARI_USER:-}" ] && [ -n "${ARI_PASSWORD:-}" ] || exit 0
    printf '[%s]\ntype = user\nread_only = no\npassword = %s\n' "$ARI_USER" "$ARI_PASSWORD" ;;
  ami)
    [ -n "${AMI_USER:-}" ] && [ -n "${AMI_PASSWORD:-}" ] || exit 0
    printf '[%s]\nsecret = %s\nread = security,system,reporting\nwrite = system\n' "$AMI_USER" "$AMI_PASSWORD" ;;
esac
