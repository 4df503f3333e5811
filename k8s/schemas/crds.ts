import { IIoK8sApimachineryPkgApisMetaV1ObjectMeta as ObjectMeta } from "@kubernetes-models/apimachinery/apis/meta/v1/ObjectMeta";
import { IComGithubKedacoreKedaV2ApisKedaV1alpha1ScaledObjectSpec as SOSpec } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObjectSpec";
import { IComGithubKedacoreKedaV2ApisKedaV1alpha1TriggerAuthenticationSpec as TASpec } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthenticationSpec";
import { IComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1ServiceMonitorSpec as SMSpec } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitorSpec";
import { IComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1PodMonitorSpec as PMSpec } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitorSpec";
import { IComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1PrometheusRuleSpec as PRSpec } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRuleSpec";
export interface ScaledObject { apiVersion: "keda.sh/v1alpha1"; kind: "ScaledObject"; metadata: ObjectMeta; spec: SOSpec; }
export interface TriggerAuthentication { apiVersion: "keda.sh/v1alpha1"; kind: "TriggerAuthentication"; metadata: ObjectMeta; spec: TASpec; }
export interface ServiceMonitor { apiVersion: "monitoring.coreos.com/v1"; kind: "ServiceMonitor"; metadata: ObjectMeta; spec: SMSpec; }
export interface PodMonitor { apiVersion: "monitoring.coreos.com/v1"; kind: "PodMonitor"; metadata: ObjectMeta; spec: PMSpec; }
export interface PrometheusRule { apiVersion: "monitoring.coreos.com/v1"; kind: "PrometheusRule"; metadata: ObjectMeta; spec: PRSpec; }
