{{/* Name of the chart, or nameOverride. */}}
{{- define "clearml-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects, at most 52 characters so that StatefulSet pod names stay labels. */}}
{{- define "clearml-fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "clearml-fleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "clearml-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "clearml-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clearml-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "clearml-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clearml-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "clearml-fleet.secretName" -}}
{{- default (include "clearml-fleet.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Environment variable of an API token: FLEET_API_TOKEN_ and the name in upper case, - as _. */}}
{{- define "clearml-fleet.tokenEnv" -}}
{{- printf "FLEET_API_TOKEN_%s" (. | upper | replace "-" "_") }}
{{- end }}

{{/*
One TOML value from a values entry: strings and lists of strings go through toJson, whose escapes TOML
accepts; numbers print as Go's %v does, so 20 stays an integer and 0.45 a float; maps become inline tables
with quoted keys.
*/}}
{{- define "clearml-fleet.tomlValue" -}}
{{- $value := . -}}
{{- if kindIs "string" $value -}}
{{- toJson $value -}}
{{- else if kindIs "slice" $value -}}
[{{- range $index, $item := $value }}{{ if $index }}, {{ end }}{{ include "clearml-fleet.tomlValue" $item }}{{ end -}}]
{{- else if kindIs "map" $value -}}
{{- $first := true -}}
{ {{- range $key, $item := $value }}{{ if not $first }},{{ end }} {{ toJson $key }} = {{ include "clearml-fleet.tomlValue" $item }}{{ $first = false }}{{ end }} }
{{- else -}}
{{- $value -}}
{{- end -}}
{{- end }}

{{/* The keys of a values map as TOML key = value lines; null values are left out. */}}
{{- define "clearml-fleet.tomlKeys" -}}
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "clearml-fleet.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
