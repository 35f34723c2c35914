package gpudispatch.nacos;

import com.alibaba.nacos.config.server.service.repository.PersistService;
import com.alibaba.nacos.core.distributed.distro.DistroProtocol;
import com.alibaba.nacos.naming.cluster.ServerStatus;
import com.alibaba.nacos.naming.cluster.ServerStatusManager;
import com.alibaba.nacos.naming.core.v2.upgrade.UpgradeJudgement;
import com.alibaba.nacos.sys.env.EnvUtil;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.http.HttpStatus;
import org.springframework.http.ResponseEntity;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RestController;

/**
 * The console module's health endpoints, at the same paths ({@code /nacos/v1/console/health/...}).
 * Readiness is 200 only when the config store answers (as in the console), the naming module
 * reports UP (stricter than the console, which only calls the naming metrics endpoint) and the
 * initial admin user, when one is configured, is in place ({@link AdminBootstrap}).
 *
 * <p>In cluster mode it is also 500 while naming runs in Nacos 2.0's 1.x compatibility mode
 * ("double write"), in which it refuses every gRPC request, i.e. every 2.x client: a new 2.0.4
 * cluster starts in that mode and leaves it when its upgrade check passes or when an operator turns
 * double write off ({@code PUT /nacos/v1/ns/operator/switches?entry=doubleWriteEnabled&value=false},
 * as Nacos's upgrade guide says for a cluster without 1.x clients; gpu_dispatch_tools/servers.py does so).
 * The body then starts with {@value #COMPATIBILITY_MODE}. It is 500, too, until the node has loaded
 * the other nodes' ephemeral instances (Distro's initial snapshot load), so that a node that
 * rejoins is ready only once it lists what the others do.
 */
@RestController("consoleHealthController")
@RequestMapping("/v1/console/health")
public class ConsoleHealthController {

    static final String COMPATIBILITY_MODE = "Naming is in 1.x compatibility mode";

    @Autowired
    private PersistService persistService;

    @Autowired
    private ServerStatusManager serverStatusManager;

    @Autowired
    private AdminBootstrap adminBootstrap;

    @Autowired
    private UpgradeJudgement upgradeJudgement;

    @Autowired
    private DistroProtocol distroProtocol;

    @GetMapping("/liveness")
    public ResponseEntity<String> liveness() {
        return ResponseEntity.ok("OK");
    }

    @GetMapping("/readiness")
    public ResponseEntity<String> readiness() {
        try {
            persistService.configInfoCount("");
        } catch (Exception e) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR).body("Config is not in readiness: " + e);
        }
        ServerStatus naming = serverStatusManager.getServerStatus();
        if (naming != ServerStatus.UP) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR).body("Naming is not in readiness: " + naming);
        }
        if (!EnvUtil.getStandaloneMode() && !upgradeJudgement.isUseGrpcFeatures()) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR)
                    .body(COMPATIBILITY_MODE + " (double write on): gRPC clients are refused until it is off");
        }
        if (!distroProtocol.isInitialized()) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR)
                    .body("Naming is not in readiness: the other nodes' instances are not loaded yet");
        }
        if (!adminBootstrap.ready()) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR)
                    .body("Auth is not in readiness: the admin user is not set up yet (" + adminBootstrap.lastFailure() + ")");
        }
        return ResponseEntity.ok("OK");
    }
}
