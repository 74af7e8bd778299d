# Shared by the build scripts (sourced, not run): which Debian mirror this machine uses.
#
# Nothing host-specific is in the repository: builds that fetch from Debian (source packages,
# a bootstrapped root) take the mirror from the system's own apt sources, so they work wherever
# the machine's apt works. scripts/lib/k8s-src.sh (the Kubernetes source package) and
# scripts/build-image.sh (the image's Debian root) both use it.

# "URI suite" lines, one per Debian bookworm suite with component main that apt is configured
# for: deb822 stanzas of type deb in /etc/apt/sources.list.d/*.sources, and one-line
# "deb [options] URI suite components..." entries in sources.list and *.list.
zp_debian_source_uris() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
               types = ""; uris = ""; suites = ""; comps = ""
               for (i = 1; i <= NF; i++) {
                 if ($i ~ /^#/) continue
                 split($i, kv, ":"); key = tolower(kv[1]); val = substr($i, length(kv[1]) + 2)
                 if (key == "types") types = val
                 else if (key == "uris") uris = val
                 else if (key == "suites") suites = val
                 else if (key == "components") comps = val
               }
               if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ /(^|[ \t])bookworm(-updates|-security)?([ \t]|$)/ \
                   && comps ~ /(^|[ \t])main([ \t]|$)/ && $0 !~ /(^|\n)Enabled:[ \t]*no/) {
                 n = split(uris, u, /[ \t]+/)
                 ns = split(suites, s, /[ \t]+/)
                 for (j = 1; j <= n; j++) for (k = 1; k <= ns; k++)
                   if (u[j] != "" && s[k] ~ /^bookworm(-updates|-security)?$/) print u[j], s[k]
               }
             }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk '$1 == "deb" && $3 ~ /^bookworm(-updates|-security)?$/ {
                   for (i = 4; i <= NF; i++) if ($i == "main") { print $2, $3; break }
                 }'
    done
}
